"""What can be pruned: models and their adapters, importance scores and orders, subnets and the
budget, prefix views, and exports.

The Python API (keyword-only options; see the README)::

    loaded = space.load_model("smollm2-135m")              # model, tokenizer, where it came from
    adapter = space.adapter_for(loaded.model)               # the family's units
    subnet = space.project(space.Subnet.dense(adapter.dims), ratio=0.7)
    with space.subnet_view(adapter, subnet) as model: ...   # the subnet, without copying weights
"""

from space.adapters import ModelAdapter, adapter_for, register_adapter
from space.budget import Bounds, project
from space.errors import UserError
from space.export import export_subnet, read_subnet_record
from space.models import LoadedModel, as_loaded, load_model
from space.order import LayerOrder, order_model, permute_model
from space.scores import SCORES, LayerScores, compute_scores, register_score
from space.subnet import LayerWidths, ModelDims, Subnet
from space.views import subnet_view

__all__ = [
    "SCORES", "Bounds", "LayerOrder", "LayerScores", "LayerWidths", "LoadedModel", "ModelAdapter", "ModelDims",
    "Subnet", "UserError", "adapter_for", "as_loaded", "compute_scores", "export_subnet", "load_model",
    "order_model", "permute_model", "project", "read_subnet_record", "register_adapter", "register_score",
    "subnet_view",
]
