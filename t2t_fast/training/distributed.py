"""Distributed setup of a run: rank facts from torchrun's environment, cross-rank sums and gathers, and the
validation sampler that sees every image exactly once."""
import os

import torch
import torch.distributed as dist


# the module a launcher (torchrun) runs for each training command
LAUNCH_MODULES = {"train": "t2t_fast.train", "finetune": "t2t_fast.cli.finetune"}


def processes_from_env():
    """The number of processes of this run as its launcher set it (torchrun's WORLD_SIZE, SLURM, MPI; 1 without
    one), known before the process group is set up."""
    from timm.utils.distributed import world_info_from_env

    return world_info_from_env()[2]


def launch_command(command, processes, per_node=None):
    """The start of the command line that runs ``t2t-fast <command>`` in ``processes`` processes: torchrun for
    more than one, ``per_node`` of them on each machine (default: all on one)."""
    if processes <= 1:
        return ["t2t-fast", command]
    per_node = per_node or processes
    nodes = [f"--nnodes={processes // per_node}"] if per_node < processes else []
    return ["torchrun", *nodes, f"--nproc_per_node={per_node}", "-m", LAUNCH_MODULES[command]]


class Distributed:
    """Rank facts from torchrun's environment (RANK/WORLD_SIZE/LOCAL_RANK; SLURM works too)."""

    def __init__(self, device=None):
        from timm.utils.distributed import init_distributed_device_so

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        info = init_distributed_device_so(device)  # nccl for CUDA, gloo for CPU
        self.device = torch.device(info["device"])
        self.rank = info["global_rank"]
        self.local_rank = info["local_rank"]
        self.world_size = info["world_size"]
        self.distributed = info["distributed"]
        self.primary = self.rank == 0
        if self.distributed and self.device.type == "cpu":
            # N processes on one machine share its cores; more threads than cores thrash.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))

    def all_reduce_sum(self, values):
        """Sum a list of floats over the ranks (identity when not distributed)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather_objects(self, obj):
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def wrap(self, model):
        """``model`` in DistributedDataParallel when distributed, else as it is."""
        if not self.distributed:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


class ShardSampler(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank``, in order, without the padding DistributedSampler adds:
    validation sees each image exactly once, so the summed accuracy is exact."""

    def __init__(self, length, rank, world_size):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
