"""The benchmark harness behind ``t2t-fast bench`` and the pytest-benchmark suite in ``bench/``.

How it measures:

* Inputs are several sets of ``torch.randn`` images (never zeros) used in turn, so caches do not flatter.
* CUDA: CUDA events around each step, after warm-up; CPU: ``time.perf_counter`` with a fixed thread count,
  glibc's malloc set to keep freed memory (:func:`~t2t_fast.bench.timing.keep_freed_memory`).
  The providers of one (model, mode, batch) are timed interleaved, round by round, so background load on a
  shared machine hits all of them alike; the median step time is reported.
* Two ceilings are measured in the same run: device copy bandwidth (bytes read + written per second) and a
  large matmul (bf16 on CUDA, the run's dtype on CPU). Every model is reported as % of the matmul ceiling
  from its MACs (inference: 2 x MACs FLOP per image; training: 3x that).
* Inference: the reference and compiled providers under ``torch.autocast`` at the run's dtype when it is
  bf16/fp16; the fused model as :func:`t2t_fast.optimize_for_inference` converts it to that dtype.
  :mod:`~t2t_fast.bench.openvino`: the same weights beside OpenVINO (``t2t-fast bench --openvino``).
* Training step: AdamW, ``torch.autocast`` at the run's dtype when it is bf16/fp16. CUDA reports the step's
  memory: peak allocated during one step minus what was allocated before it (activations, gradients,
  temporaries; not the weights or optimizer state).

:mod:`~t2t_fast.bench.timing` (timers, ceilings), :mod:`~t2t_fast.bench.providers` (what is timed) and
:mod:`~t2t_fast.bench.runner` (the run, its environment, table and plot); their names are importable from
here.
"""
from t2t_fast.bench.providers import (DTYPES, MACS_224, MODES, NUM_INPUT_SETS, PROVIDERS, T2T_MODULE_MACS_224,
                                      TIMM_MODELS, autocast, build_fused, build_provider, build_reference,
                                      count_macs, inference_step, is_t2t, make_inputs, model_macs,
                                      optimized_inference_step, step_memory, training_step)
from t2t_fast.bench.runner import (cpu_name, environment, format_table, git_commit, log, nvidia_driver, plot, run,
                                   run_case)
from t2t_fast.bench.timing import (CPU_THREADS, bandwidth_info, compute_info, cpu_threads, is_cuda,
                                   keep_freed_memory, measure_ceilings, measure_copy_bandwidth, measure_matmul_ceiling,
                                   pedantic_timed, synchronize, time_calls)

__all__ = ["DTYPES", "MACS_224", "MODES", "NUM_INPUT_SETS", "PROVIDERS", "T2T_MODULE_MACS_224", "TIMM_MODELS",
           "autocast", "build_fused", "build_provider", "build_reference", "count_macs", "inference_step",
           "is_t2t", "make_inputs", "model_macs", "optimized_inference_step", "step_memory", "training_step",
           "cpu_name", "environment", "format_table", "git_commit", "log", "nvidia_driver", "plot", "run", "run_case",
           "CPU_THREADS", "bandwidth_info", "compute_info", "cpu_threads", "is_cuda", "keep_freed_memory",
           "measure_ceilings",
           "measure_copy_bandwidth", "measure_matmul_ceiling", "pedantic_timed", "synchronize", "time_calls"]
