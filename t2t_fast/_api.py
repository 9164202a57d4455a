"""The timm-style model API shared by the reference and the fast T2T-ViT (no forward math here)."""
import torch
import torch.nn as nn

from t2t_fast import _config


class T2TViTAPI:
    """Mixin: classifier handling, weight-decay groups, init, pretrained config, checkpointing switch.

    Expects ``num_features``, ``num_classes``, ``head``, ``img_size``, ``in_chans`` on the model."""

    num_prefix_tokens = 1
    global_pool = "token"

    @property
    def pretrained_cfg(self):
        cfg = dict(_config.DEFAULT_CFG)
        cfg["input_size"] = (self.in_chans, *self.img_size)
        cfg["num_classes"] = self.num_classes
        cfg["fixed_input_size"] = not self.dynamic_img_size
        if getattr(self, "variant", None):
            cfg["architecture"] = self.variant
            cfg["url"] = _config.checkpoint_url(self.variant)
        return cfg

    @property
    def default_cfg(self):
        return self.pretrained_cfg

    @property
    def head_hidden_size(self):
        return self.num_features

    @staticmethod
    def init_module_weights(module):
        """Official init: trunc-normal(0.02) Linear weights, zero biases, LayerNorm (1, 0)."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def init_weights(self):
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self.init_module_weights)

    def no_weight_decay(self):
        """Parameter names excluded from weight decay (the frozen pos_embed and w are not trained at all)."""
        return {"cls_token"}

    def group_matcher(self, coarse=False):
        """Parameter groups for layer-wise LR decay, as timm's ViT defines them."""
        return dict(stem=r"^cls_token|pos_embed|tokens_to_token",
                    blocks=r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        """Replace the head by a fresh ``Linear(num_features, num_classes)`` (``Identity`` for 0)."""
        if global_pool not in (None, "token"):
            raise ValueError(f"T2T-ViT pools the cls token only; global_pool={global_pool!r} is not supported")
        self.num_classes = num_classes
        device = self.cls_token.device
        self.head = nn.Linear(self.num_features, num_classes).to(device) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self.init_module_weights(self.head)

    def set_grad_checkpointing(self, enable=True):
        """Checkpoint every backbone block in training (recompute activations in backward)."""
        self.grad_checkpointing = enable

    def position_table(self, num_tokens):
        """``pos_embed``, or for another token count (``dynamic_img_size``) the sinusoid table of that length."""
        if num_tokens == self.pos_embed.shape[1]:
            return self.pos_embed
        key = (num_tokens, self.pos_embed.device, self.pos_embed.dtype)
        # One table per token count, device and dtype, built once (eager; compiled graphs build it inline).
        cache = None if torch.compiler.is_compiling() else self.__dict__.setdefault("_position_tables", {})
        if cache is not None and key in cache:
            return cache[key]
        table = _config.sinusoid_table(num_tokens, self.pos_embed.shape[-1])
        table = table.to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)
        if cache is not None:
            cache[key] = table
        return table

    def forward_head(self, x, pre_logits=False):
        """Classifier on the cls token of ``forward_features``' output; ``pre_logits`` returns it unclassified."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))
