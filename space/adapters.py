"""Model adapters: where a model family keeps the modules the engine prunes.

To add an architecture, write one :class:`ModelAdapter` subclass that names its
``model_types`` and says where the decoder layers, embeddings and head live, and (only if its
layers differ from the Llama layout) one :class:`LayerAdapter` subclass that hands back the real
``q/k/v/o`` and ``gate/up/down`` modules. Register it with :func:`register_adapter`. Everything
else (scores, slicing, reformation, export) is written as free functions over adapters.

The units an adapter declares (METHODS.md section 1):

* **KV group**: one key head + one value head + the ``group_size`` query heads that share them.
* **query head**: ``head_dim`` rows of q_proj and the matching ``head_dim`` columns of o_proj.
  Heads are whole (RoPE pairs dimension i with i + head_dim/2); a pruned layer stays a standard
  GQA layer (the same number of query heads per kept KV head).
* **MLP channel**: row j of gate_proj and up_proj, column j of down_proj.

Parameters that span the heads besides the projections (OLMo-2's q_norm/k_norm over all heads)
are declared by :meth:`LayerAdapter.head_norms` and sliced and permuted with the rows of q and k.
Norms over ``head_dim`` shared by every head (Qwen3, Gemma 3) and norms around the sub-layers
(Gemma's and OLMo-2's post-attention/feed-forward norms) are not pruned: a skipped sub-layer adds
zero, and a norm of zero is zero.

Adapters are chosen by ``config.model_type``, never by a name substring; exports of ours
(``llm_pruner_<family>``) map back to their family.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from space.errors import UserError
from space.modeling_llm_pruner import MODEL_TYPE_PREFIX
from space.subnet import ModelDims


class LayerAdapter:
    """One decoder layer of the Llama layout: ``self_attn.{q,k,v,o}_proj`` and
    ``mlp.{gate,up,down}_proj``. Properties return the real modules, never tensors."""

    def __init__(self, layer: nn.Module, index: int):
        self.layer = layer
        self.index = index

    @property
    def attention(self) -> nn.Module:
        return self.layer.self_attn

    @attention.setter
    def attention(self, module: nn.Module) -> None:
        self.layer.self_attn = module

    @property
    def mlp(self) -> nn.Module:
        return self.layer.mlp

    @mlp.setter
    def mlp(self, module: nn.Module) -> None:
        self.layer.mlp = module

    def attention_inputs(self) -> list[nn.Linear]:
        """The projections whose output rows are unit rows (q, k, v)."""
        a = self.attention
        return [a.q_proj, a.k_proj, a.v_proj]

    def attention_output(self) -> nn.Linear:
        """The projection whose input columns are unit columns (o)."""
        return self.attention.o_proj

    def mlp_inputs(self) -> list[nn.Linear]:
        return [self.mlp.gate_proj, self.mlp.up_proj]

    def mlp_output(self) -> nn.Linear:
        return self.mlp.down_proj

    def head_norms(self) -> tuple[nn.Module | None, nn.Module | None]:
        """The norms whose weight has one entry per row of q_proj (first) and of k_proj (second),
        sliced and permuted with those rows; ``(None, None)`` where the family has none."""
        return None, None

    def linears(self) -> dict[str, nn.Linear]:
        """Every prunable linear of the layer by its short name (q, k, v, o, gate, up, down)."""
        q, k, v = self.attention_inputs()
        gate, up = self.mlp_inputs()
        return {"q": q, "k": k, "v": v, "o": self.attention_output(), "gate": gate, "up": up, "down": self.mlp_output()}


class ModelAdapter:
    """A whole causal LM of one family. Subclasses set ``model_types`` and may override the
    accessors; the default layout is ``model.model.{embed_tokens,layers,norm}`` + ``lm_head``."""

    model_types: ClassVar[tuple[str, ...]] = ()
    layer_adapter: ClassVar[type[LayerAdapter]] = LayerAdapter
    notes: ClassVar[str] = ""
    # Each sub-layer's output projection is added to the residual stream as it is (no norm after it):
    # what the residual least-squares mode (reform/sequential.py) assumes.
    plain_residual: ClassVar[bool] = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.layers = [self.layer_adapter(layer, i) for i, layer in enumerate(self.decoder_layers())]
        self.dims = self._dims()

    def decoder(self) -> nn.Module:
        return self.model.model

    def decoder_layers(self) -> nn.ModuleList:
        return self.decoder().layers

    def embeddings(self) -> nn.Module:
        return self.decoder().embed_tokens

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def _dims(self) -> ModelDims:
        c = self.config
        if getattr(c, "is_heterogeneous", False):
            raise UserError(
                "this model is already pruned (its layers have different widths); prune or reform "
                "its source model instead (subnet.json names it)"
            )
        heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        first = self.layers[0]
        norms = [m for m in first.head_norms() if m is not None]
        if norms and [m.weight.numel() for m in norms] != [heads * head_dim, kv_heads * head_dim]:
            raise UserError(f"model type {c.model_type!r}: its q/k norms do not span the heads as its adapter declares")
        sliced = {id(p) for m in [*first.linears().values(), *norms] for p in m.parameters()}
        dims = ModelDims(
            num_layers=len(self.layers),
            hidden_size=c.hidden_size,
            head_dim=head_dim,
            num_heads=heads,
            num_kv_heads=kv_heads,
            intermediate_size=c.intermediate_size,
            qkv_bias=first.attention_inputs()[0].bias is not None,
            o_bias=first.attention_output().bias is not None,
            mlp_bias=first.mlp_output().bias is not None,
            head_norms=bool(norms),
            attention_fixed=sum(
                p.numel() for p in first.attention.parameters()
                if id(p) not in sliced and p.dim() == 1 and p.numel() == head_dim
            ),
        )
        # Everything outside the layers' prunable sub-layers: embeddings, head (once when tied), norms.
        total = sum(p.numel() for p in self.model.parameters())
        layers = len(self.layers) * dims.layer_total_params(dims.dense_layer())
        return ModelDims(**{**dims.to_dict(), "other_params": total - layers})


class LlamaAdapter(ModelAdapter):
    model_types = ("llama",)
    notes = "MHA and GQA; optional biases on q/k/v/o (attention_bias) and on the MLP (mlp_bias)."


class MistralAdapter(ModelAdapter):
    model_types = ("mistral",)
    notes = "The Llama layout with GQA and an optional sliding window (which pruning does not touch)."


class Qwen2Adapter(ModelAdapter):
    model_types = ("qwen2",)
    notes = "q/k/v carry biases: their entries are kept, permuted and sliced with the rows they belong to."


class Qwen3Adapter(ModelAdapter):
    model_types = ("qwen3",)
    notes = "q_norm/k_norm act on head_dim, shared by all heads: whole-head pruning leaves them as they are."


class HeadNormLayerAdapter(LayerAdapter):
    """A layer whose attention normalises q and k over all heads at once (``q_norm`` of
    ``num_heads * head_dim`` entries, ``k_norm`` of ``num_kv_heads * head_dim``)."""

    def head_norms(self) -> tuple[nn.Module | None, nn.Module | None]:
        return self.attention.q_norm, self.attention.k_norm


class Olmo2Adapter(ModelAdapter):
    model_types = ("olmo2",)
    layer_adapter = HeadNormLayerAdapter
    plain_residual = False
    notes = (
        "q_norm/k_norm are RMS norms over all heads: their weights are permuted and sliced with the heads, and "
        "a pruned layer normalises over its kept heads (what the view computes is what the export computes; "
        "estimates read from dense activations, such as the least-squares fitness, are approximate for the kept "
        "heads). Norms after attention and after the MLP (no norm before them) are not pruned."
    )


class Gemma2Adapter(ModelAdapter):
    model_types = ("gemma2",)
    plain_residual = False
    notes = (
        "Norms before and after attention and the MLP; the attention scale comes from query_pre_attn_scalar and "
        "the soft-capping, sliding-window layers and embedding scale (sqrt(hidden_size)) do not depend on the "
        "widths pruning changes."
    )


class Gemma3Adapter(ModelAdapter):
    model_types = ("gemma3_text",)
    plain_residual = False
    notes = "Gemma 2's layout plus q_norm/k_norm over head_dim (shared by all heads) and per-layer-type RoPE."


# Families that are recognised but refused, and why (never a silently wrong model).
REFUSED: dict[str, str] = {
    "phi3": (
        "Phi-3 fuses q/k/v into one qkv_proj and gate/up into one gate_up_proj, and its attention splits qkv_proj "
        "by the model-wide head counts, so it is pruned in its exact unfused form: load it with "
        "space.models.load_model (the command line does), or pass space.unfuse.unfused(model)"
    ),
    "gemma3": (
        "this is the multimodal Gemma 3 (model type 'gemma3'); load its text model (Gemma3ForCausalLM, model type "
        "'gemma3_text', e.g. gemma-3-1b) to prune it"
    ),
}

_ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


for _cls in (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Olmo2Adapter, Gemma2Adapter, Gemma3Adapter):
    register_adapter(_cls)


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def family(model_type: str) -> str:
    """The stock family of a model type (``llm_pruner_llama`` -> ``llama``)."""
    return model_type[len(MODEL_TYPE_PREFIX):] if model_type.startswith(MODEL_TYPE_PREFIX) else model_type


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family, chosen by ``config.model_type``."""
    model_type = family(getattr(model.config, "model_type", "") or "")
    if model_type in REFUSED and model_type not in _ADAPTERS:
        raise UserError(f"model type {model_type!r}: {REFUSED[model_type]}")
    if model_type not in _ADAPTERS:
        raise UserError(
            f"model type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    return _ADAPTERS[model_type](model)
