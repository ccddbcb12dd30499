"""Where each Hugging Face weight lives inside the tensors vLLM holds, per architecture.

vLLM merges `q_proj/k_proj/v_proj` into `qkv_proj` and `gate_proj/up_proj` into `gate_up_proj`
(concatenated along dim 0, output features), pads the vocabulary rows of `embed_tokens`/`lm_head` to a
multiple of 64, and with tied embeddings exports only `model.embed_tokens.weight` from
`named_parameters()` (its `lm_head.weight` IS that parameter). The tables below say this once per
architecture; everything else (validation, zero-copy views, packing an HF state dict into vLLM's
layout) is derived from them. Checked against vllm 0.32 `models/{llama,qwen2,qwen3}.py` with
tensor parallel size 1 (one GPU, one process holds every tensor whole). Architectures whose layers differ
by index or that hold experts build their plan from the same rows in `layouts_qwen35.py` and
`layouts_moe.py` (docs/layouts.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from onlinemodel_runtime.checkpoint.model_tensors import CheckpointNames

# vLLM's DEFAULT_VOCAB_PADDING_SIZE (vocab_parallel_embedding.py).
VOCAB_PADDING = 64


class LayoutError(ValueError):
    """The vLLM tensors do not match what the HF config says (or the architecture is unsupported)."""


# ---------------------------------------------------------------------------------------------
# Declarative tables.
#
# One row per vLLM tensor: (vLLM name, HF parts concatenated along dim 0 as (HF name, rows),
# trailing dims (one symbol, a tuple of symbols, or None for 1-D), condition flag or None). Sizes are
# symbols resolved from the config:
#   hidden, q = heads*head_dim, kv = kv_heads*head_dim, inter = intermediate_size, vocab, head_dim.
# Names in the layer rows are relative to `model.layers.{i}.`.
# ---------------------------------------------------------------------------------------------
_Row = tuple[str, tuple[tuple[str, str], ...], "str | tuple[str, ...] | None", "str | None"]

GLOBAL_ROWS: tuple[_Row, ...] = (
    ("model.embed_tokens.weight", (("model.embed_tokens.weight", "vocab"),), "hidden", None),
    ("lm_head.weight", (("lm_head.weight", "vocab"),), "hidden", "untied"),
    ("model.norm.weight", (("model.norm.weight", "hidden"),), None, None),
)

NORM_ROWS: tuple[_Row, ...] = (
    ("input_layernorm.weight", (("input_layernorm.weight", "hidden"),), None, None),
    ("post_attention_layernorm.weight", (("post_attention_layernorm.weight", "hidden"),), None, None),
)

ATTENTION_ROWS: tuple[_Row, ...] = (
    ("self_attn.qkv_proj.weight",
     (("self_attn.q_proj.weight", "q"), ("self_attn.k_proj.weight", "kv"), ("self_attn.v_proj.weight", "kv")),
     "hidden", None),
    ("self_attn.qkv_proj.bias",
     (("self_attn.q_proj.bias", "q"), ("self_attn.k_proj.bias", "kv"), ("self_attn.v_proj.bias", "kv")),
     None, "qkv_bias"),
    ("self_attn.o_proj.weight", (("self_attn.o_proj.weight", "hidden"),), "q", None),
    ("self_attn.o_proj.bias", (("self_attn.o_proj.bias", "hidden"),), None, "o_bias"),
    ("self_attn.q_norm.weight", (("self_attn.q_norm.weight", "head_dim"),), None, "qk_norm"),
    ("self_attn.k_norm.weight", (("self_attn.k_norm.weight", "head_dim"),), None, "qk_norm"),
)

MLP_ROWS: tuple[_Row, ...] = (
    ("mlp.gate_up_proj.weight", (("mlp.gate_proj.weight", "inter"), ("mlp.up_proj.weight", "inter")),
     "hidden", None),
    ("mlp.gate_up_proj.bias", (("mlp.gate_proj.bias", "inter"), ("mlp.up_proj.bias", "inter")), None, "mlp_bias"),
    ("mlp.down_proj.weight", (("mlp.down_proj.weight", "hidden"),), "inter", None),
    ("mlp.down_proj.bias", (("mlp.down_proj.bias", "hidden"),), None, "mlp_bias"),
)

_LAYER_TABLE = NORM_ROWS + ATTENTION_ROWS + MLP_ROWS


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    return getattr(config, name, default)


def _llama_flags(c: Any) -> dict[str, bool]:
    # vLLM llama.py: bias = attention_bias or `bias` (Smaug); o_proj uses the same flag.
    attn_bias = bool(_cfg(c, "attention_bias", False) or _cfg(c, "bias", False))
    return dict(qkv_bias=attn_bias, o_bias=attn_bias, mlp_bias=bool(_cfg(c, "mlp_bias", False)), qk_norm=False)


def _qwen2_flags(c: Any) -> dict[str, bool]:
    return dict(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)


def _qwen3_flags(c: Any) -> dict[str, bool]:
    if _cfg(c, "attention_bias", False):
        # HF Qwen3 then has an o_proj bias that vLLM's Qwen3 has no parameter for.
        raise LayoutError("Qwen3ForCausalLM with attention_bias=true is not supported: "
                          "vLLM's Qwen3 has no o_proj bias, so the HF model would not match")
    return dict(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=True)


def _head_dim_from_config(c: Any) -> int:
    return int(_cfg(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def _qwen2_head_dim(c: Any) -> int:
    # vLLM's Qwen2 always uses hidden_size // num_heads and ignores config.head_dim.
    derived = c.hidden_size // c.num_attention_heads
    given = _cfg(c, "head_dim", None)
    if given is not None and int(given) != derived:
        raise LayoutError(f"Qwen2ForCausalLM: config head_dim={given} but vLLM uses "
                          f"hidden_size/num_attention_heads={derived}; unsupported")
    return derived


@dataclass(frozen=True)
class LayoutPlan:
    """What one architecture's config resolves to; ModelLayout derives everything else from it.

    tables: (rows, HF name prefix) in vLLM's parameter order. sizes/flags: the symbols the rows use.
    hf_config: the config the trainer's transformers causal LM is built from (a multimodal model's
    text config). vllm_prefixes: (HF prefix, vLLM prefix) renames of whole names. dtypes: vLLM row
    name (relative) -> the dtype vLLM keeps it in whatever it serves. passengers: vLLM name prefixes
    that are exported but never attached (a frozen vision tower). checkpoint: how the trainer's
    tensors are named in a checkpoint, and which base tensors it carries over (the base
    checkpoint's own names: a multimodal model's language-model prefix, experts one by one).
    """

    tables: tuple[tuple[tuple[_Row, ...], str], ...]
    sizes: Mapping[str, int]
    flags: Mapping[str, bool]
    hf_config: Any
    vllm_prefixes: tuple[tuple[str, str], ...] = ()
    dtypes: Mapping[str, torch.dtype] = field(default_factory=dict)
    passengers: tuple[str, ...] = ()
    checkpoint: CheckpointNames = CheckpointNames()


def _dense_plan(flags: Callable[[Any], dict[str, bool]], head_dim: Callable[[Any], int]
                ) -> Callable[[Any], LayoutPlan]:
    def plan(c: Any) -> LayoutPlan:
        hd = head_dim(c)
        sizes = dict(hidden=int(c.hidden_size), head_dim=hd, q=int(c.num_attention_heads) * hd,
                     kv=int(_cfg(c, "num_key_value_heads", None) or c.num_attention_heads) * hd,
                     inter=int(c.intermediate_size), vocab=int(c.vocab_size))
        tables = ((GLOBAL_ROWS, ""),) + tuple(
            (_LAYER_TABLE, f"model.layers.{i}.") for i in range(int(c.num_hidden_layers)))
        return LayoutPlan(tables, sizes, flags(c), hf_config=c)

    return plan


def _plan_in(module: str, function: str) -> Callable[[Any], LayoutPlan]:
    """A plan defined in a sibling module, imported on first use (those modules import this one)."""
    def plan(c: Any) -> LayoutPlan:
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)(c)

    return plan


ARCHITECTURES: Mapping[str, Callable[[Any], LayoutPlan]] = {
    "LlamaForCausalLM": _dense_plan(_llama_flags, _head_dim_from_config),
    "Qwen2ForCausalLM": _dense_plan(_qwen2_flags, _qwen2_head_dim),
    "Qwen3ForCausalLM": _dense_plan(_qwen3_flags, _head_dim_from_config),
    "Qwen3MoeForCausalLM": _plan_in("layouts_moe", "qwen3_moe_plan"),
    "Qwen3_5ForConditionalGeneration": _plan_in("layouts_qwen35", "qwen35_plan"),
    "Qwen3_5ForCausalLM": _plan_in("layouts_qwen35", "qwen35_plan"),
    "Qwen3_5MoeForConditionalGeneration": _plan_in("layouts_qwen35", "qwen35_plan"),
    "Qwen3_5MoeForCausalLM": _plan_in("layouts_qwen35", "qwen35_plan"),
}


def supported_architectures() -> tuple[str, ...]:
    return tuple(ARCHITECTURES)


# ---------------------------------------------------------------------------------------------
# Derived layout.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """An HF tensor is `vllm_tensors[vllm_name].narrow(dim, offset, length)`."""

    vllm_name: str
    dim: int
    offset: int
    length: int


@dataclass(frozen=True)
class VllmTensorSpec:
    """What one vLLM tensor must look like. `shape[0]` may be padded when `vocab_padded`."""

    name: str
    shape: tuple[int, ...]
    vocab_padded: bool
    parts: tuple[tuple[str, int, int], ...]  # (HF name, offset, length) along dim 0
    dtype: torch.dtype | None = None  # declared by the architecture; None: the dtype vLLM serves


def padded_vocab_size(vocab: int, pad_to: int = VOCAB_PADDING) -> int:
    return ((vocab + pad_to - 1) // pad_to) * pad_to


def config_dtype(config: Any) -> torch.dtype | None:
    """The config's dtype (`dtype` in transformers 5, `torch_dtype` in 4.x), or None."""
    value = _cfg(config, "dtype", None) or _cfg(config, "torch_dtype", None)
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise LayoutError(f"config dtype {value!r} is not a torch dtype")
    return dtype


class ModelLayout:
    """The layout of one model config: vLLM tensor specs and HF name -> Slot."""

    def __init__(self, config: Any):
        arch_list = _cfg(config, "architectures", None) or []
        arch = arch_list[0] if arch_list else None
        if arch not in ARCHITECTURES:
            raise LayoutError(f"unsupported architecture {arch!r} (config.architectures={arch_list!r}); "
                              f"supported: {', '.join(ARCHITECTURES)}")
        plan = ARCHITECTURES[arch](config)
        self.architecture: str = arch
        self.config = config
        self.plan = plan
        self.hf_config = plan.hf_config
        self.checkpoint_names: CheckpointNames = plan.checkpoint
        self.tied: bool = bool(_cfg(plan.hf_config, "tie_word_embeddings", False))
        self.sizes: dict[str, int] = dict(plan.sizes)
        self.flags: dict[str, bool] = dict(plan.flags, untied=not self.tied)

        self.vllm_specs: dict[str, VllmTensorSpec] = {}
        self.hf_to_vllm: dict[str, Slot] = {}
        for table, prefix in plan.tables:
            for vname, parts, cols, flag in table:
                if flag is not None and not self.flags[flag]:
                    continue
                full = self.vllm_name(prefix + vname)
                offset, placed = 0, []
                for hf_name, size_sym in parts:
                    length = self.sizes[size_sym]
                    placed.append((prefix + hf_name, offset, length))
                    self.hf_to_vllm[prefix + hf_name] = Slot(full, 0, offset, length)
                    offset += length
                trailing = () if cols is None else (cols,) if isinstance(cols, str) else cols
                self.vllm_specs[full] = VllmTensorSpec(
                    full, (offset, *(self.sizes[c] for c in trailing)), vocab_padded=parts[0][1] == "vocab",
                    parts=tuple(placed), dtype=plan.dtypes.get(vname))
        if self.tied:
            # HF's lm_head.weight IS model.embed_tokens.weight (same Parameter); so is vLLM's.
            self.hf_to_vllm["lm_head.weight"] = self.hf_to_vllm["model.embed_tokens.weight"]

    def vllm_name(self, hf_side_name: str) -> str:
        """The vLLM name of a tensor named `hf_side_name` in HF's prefix convention."""
        for hf_prefix, vllm_prefix in self.plan.vllm_prefixes:
            if hf_side_name.startswith(hf_prefix):
                return vllm_prefix + hf_side_name[len(hf_prefix):]
        return hf_side_name

    # -- validation ---------------------------------------------------------------------------
    def expected_dtype(self, expected_dtype: torch.dtype | None = None) -> torch.dtype | None:
        return expected_dtype if expected_dtype is not None else config_dtype(self.config)

    def validate(self, vllm_tensors: Mapping[str, torch.Tensor], expected_dtype: torch.dtype | None = None) -> None:
        """Raise LayoutError unless `vllm_tensors` has exactly the expected names, shapes, dtype."""
        want_dtype = self.expected_dtype(expected_dtype)
        dtype_src = "expected_dtype" if expected_dtype is not None else "config dtype"
        problems: list[str] = []
        missing = [n for n in self.vllm_specs if n not in vllm_tensors]
        unknown = [n for n in vllm_tensors if n not in self.vllm_specs and not n.startswith(self.plan.passengers)]
        if missing:
            problems.append(f"missing {len(missing)} tensor(s): {_head(missing)}")
        for name in unknown:
            hint = ""
            if name == self.vllm_name("lm_head.weight") and self.tied:
                hint = (" (tie_word_embeddings=true: vLLM's lm_head.weight is model.embed_tokens.weight; "
                        "export named_parameters() with remove_duplicate=True)")
            elif name.startswith("mtp."):
                hint = " (a multi-token-prediction head: onlinemodel trains and exports the served model only)"
            problems.append(f"unexpected tensor {name!r}{hint}")
        seen_dtypes = set()
        for name, spec in self.vllm_specs.items():
            t = vllm_tensors.get(name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                problems.append(f"{name}: expected a torch.Tensor, found {type(t).__name__}")
                continue
            if spec.dtype is not None:
                if t.dtype != spec.dtype:
                    problems.append(f"{name}: expected dtype {spec.dtype} (vLLM keeps it so), found {t.dtype}")
            else:
                seen_dtypes.add(t.dtype)
                if want_dtype is not None and t.dtype != want_dtype:
                    problems.append(f"{name}: expected dtype {want_dtype} ({dtype_src}), found {t.dtype}")
            problems.extend(self._shape_problems(spec, t))
            if not t.is_contiguous():
                # The HF views are row slices; they only alias the right bytes of a contiguous tensor.
                problems.append(f"{name}: expected a contiguous tensor, found strides {tuple(t.stride())}")
        if want_dtype is None and len(seen_dtypes) > 1:
            problems.append(f"tensors have mixed dtypes {sorted(map(str, seen_dtypes))} and no dtype is expected")
        if problems:
            raise LayoutError(f"{self.architecture} weights do not match the config "
                              f"({len(problems)} problem(s)): " + "; ".join(problems[:12])
                              + ("; ..." if len(problems) > 12 else ""))

    def _shape_problems(self, spec: VllmTensorSpec, t: torch.Tensor) -> list[str]:
        shape = tuple(t.shape)
        if spec.vocab_padded:
            vocab, padded = spec.shape[0], padded_vocab_size(spec.shape[0])
            ok = len(shape) == 2 and shape[1] == spec.shape[1] and shape[0] in (vocab, padded)
            if not ok:
                return [f"{spec.name}: expected shape ({vocab} or padded {padded}, {spec.shape[1]}), "
                        f"found {shape}"]
            return []
        if shape != spec.shape:
            detail = " + ".join(f"{n.rsplit('.', 2)[-2]}[{length}]" for n, _, length in spec.parts)
            why = f" ({detail})" if len(spec.parts) > 1 else ""
            return [f"{spec.name}: expected shape {spec.shape}{why}, found {shape}"]
        return []

    # -- both directions ----------------------------------------------------------------------
    def hf_views(self, vllm_tensors: Mapping[str, torch.Tensor], expected_dtype: torch.dtype | None = None,
                 ) -> dict[str, torch.Tensor]:
        """Validate, then return HF name -> zero-copy view (tied lm_head.weight is the embed view)."""
        self.validate(vllm_tensors, expected_dtype)
        views: dict[str, torch.Tensor] = {}
        for hf_name, slot in self.hf_to_vllm.items():
            if hf_name == "lm_head.weight" and self.tied:
                continue
            base = vllm_tensors[slot.vllm_name].detach()
            views[hf_name] = base.narrow(slot.dim, slot.offset, slot.length)
        if self.tied:
            views["lm_head.weight"] = views["model.embed_tokens.weight"]
        return views

    def pack_hf_state_dict(self, hf_state_dict: Mapping[str, torch.Tensor], *, pad_vocab: bool = True,
                           dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Build vLLM-layout tensors (fresh memory) from an HF state dict, as vLLM's loader would.

        Padded vocabulary rows are zero, like vLLM's. `dtype` casts (default: keep); tensors the
        architecture declares a dtype for get that one, as vLLM's loader casts them.
        """
        problems = []
        allowed = set(self.hf_to_vllm)
        unknown = [k for k in hf_state_dict if k not in allowed]
        missing = [k for k in allowed if k not in hf_state_dict and not (k == "lm_head.weight" and self.tied)]
        if unknown:
            problems.append(f"unexpected HF tensor(s): {_head(unknown)}")
        if missing:
            problems.append(f"missing HF tensor(s): {_head(missing)}")
        if problems:
            raise LayoutError(f"{self.architecture} state dict does not match the config: " + "; ".join(problems))
        out: dict[str, torch.Tensor] = {}
        for name, spec in self.vllm_specs.items():
            first = hf_state_dict[spec.parts[0][0]]
            rows = spec.shape[0]
            if spec.vocab_padded and pad_vocab:
                rows = padded_vocab_size(rows)
            packed = torch.zeros((rows, *spec.shape[1:]), dtype=spec.dtype or dtype or first.dtype,
                                 device=first.device)
            for hf_name, offset, length in spec.parts:
                src = hf_state_dict[hf_name]
                want = (length, *spec.shape[1:])
                if tuple(src.shape) != want:
                    raise LayoutError(f"{hf_name}: expected shape {want}, found {tuple(src.shape)}")
                packed[offset:offset + length].copy_(src)
            out[name] = packed
        return out

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> expected shape (unpadded)."""
        result = {}
        for hf_name, slot in self.hf_to_vllm.items():
            spec = self.vllm_specs[slot.vllm_name]
            result[hf_name] = (slot.length, *spec.shape[1:])
        return result


def _head(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def layout_for(config: Any) -> ModelLayout:
    """The layout of `config` (a transformers PretrainedConfig); LayoutError if unsupported."""
    return ModelLayout(config)


def validate(config: Any, vllm_tensors: Mapping[str, torch.Tensor],
             expected_dtype: torch.dtype | None = None) -> ModelLayout:
    """Check names, shapes and dtypes of vLLM's tensors against `config`; return the layout."""
    layout = ModelLayout(config)
    layout.validate(vllm_tensors, expected_dtype)
    return layout


def hf_views(config: Any, vllm_tensors: Mapping[str, torch.Tensor],
             expected_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF name -> zero-copy view into `vllm_tensors`, after validation."""
    return ModelLayout(config).hf_views(vllm_tensors, expected_dtype)


def pack_hf_state_dict(config: Any, hf_state_dict: Mapping[str, torch.Tensor], *, pad_vocab: bool = True,
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF state dict -> dict of vLLM-layout tensors (what vLLM's `named_parameters()` holds)."""
    return ModelLayout(config).pack_hf_state_dict(hf_state_dict, pad_vocab=pad_vocab, dtype=dtype)
