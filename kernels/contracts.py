"""What the fused kernels and the model's MoE layer agree on: the routing record and the argument checks.

T tokens · K experts per token · E experts · D width · H expert hidden width

The lowest layer: :mod:`kernels.moe` launches on these types and :mod:`fusion.moe` builds them (its
:func:`~fusion.moe.route` makes a :class:`Routing`); nothing here imports either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Routing", "check_expert_ffn_args", "check_float_tensor", "check_index_tensor"]


def check_float_tensor(name: str, value: object, rank: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {value.dtype}")
    if value.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}; got shape {tuple(value.shape)}")
    return value


def check_index_tensor(name: str, value: object, rank: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if value.dtype != torch.int64:
        raise TypeError(f"{name} must be int64; got dtype {value.dtype}")
    if value.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}; got shape {tuple(value.shape)}")
    return value


@dataclass(frozen=True, eq=False)
class Routing:
    """Which experts each token goes to and with what weight.

    Built by :func:`fusion.moe.route`; checks ranks, dtypes and sizes when built (not the values, which would need a
    device synchronisation). Equality is identity: tensors have no single truth value.

    Attributes:
        weights: ``[T, K]`` mixing weight of each chosen expert: the unbiased scores of the chosen experts
            renormalised to sum to 1 per token, times ``route_scale``. float32 (float64 for float64 logits).
        indices: ``[T, K]`` int64 chosen experts, distinct per token, in descending order of biased score.
        scores: ``[T, E]`` router affinities before the bias, same dtype as ``weights``.
    """

    weights: Tensor
    indices: Tensor
    scores: Tensor

    def __post_init__(self) -> None:
        check_float_tensor("Routing.weights", self.weights, 2)
        check_index_tensor("Routing.indices", self.indices, 2)
        check_float_tensor("Routing.scores", self.scores, 2)
        if self.weights.shape != self.indices.shape:
            raise ValueError(
                f"Routing.weights and Routing.indices must both be [T, K]; got {tuple(self.weights.shape)} "
                f"and {tuple(self.indices.shape)}"
            )
        if self.scores.shape[0] != self.indices.shape[0]:
            raise ValueError(
                f"Routing.scores must be [T, E] with T={self.indices.shape[0]} tokens like the indices; "
                f"got {tuple(self.scores.shape)}"
            )
        if self.indices.shape[1] > self.scores.shape[1]:
            raise ValueError(
                f"Routing chooses K={self.indices.shape[1]} experts per token but scores has only "
                f"E={self.scores.shape[1]}"
            )

    @property
    def n_experts(self) -> int:
        """E, the number of routed experts the scores cover."""
        return self.scores.shape[1]


def check_expert_ffn_args(x: object, routing: object, w_gate: object, w_up: object, w_down: object) -> None:
    """Check the arguments of an expert computation (:data:`ExpertFFN`): types, ranks and sizes.

    Shared by :func:`fusion.moe.expert_ffn_reference` and the fused kernels' launcher (:mod:`kernels.moe`).

    Raises:
        TypeError: ``routing`` is not a :class:`Routing`, or a tensor is missing or not floating point.
        ValueError: a rank or a size does not agree.
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing (kernels.contracts); got {type(routing).__name__}")
    for name, value, shape in (("x", x, "[T, D]"), ("w_gate", w_gate, "[E, D, H]"), ("w_up", w_up, "[E, D, H]"),
                               ("w_down", w_down, "[E, H, D]")):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a {shape} torch.Tensor; got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point {shape} tensor; got dtype {value.dtype}")
        if value.dim() != shape.count(",") + 1:
            raise ValueError(f"{name} must be {shape}; got shape {tuple(value.shape)}")
    n_tokens, dim = x.shape
    n_experts, _, hidden = w_gate.shape
    if tuple(w_gate.shape) != (n_experts, dim, hidden) or tuple(w_up.shape) != (n_experts, dim, hidden):
        raise ValueError(
            f"w_gate and w_up must be [E, D, H] with D={dim} (x's width); got {tuple(w_gate.shape)} and "
            f"{tuple(w_up.shape)}"
        )
    if tuple(w_down.shape) != (n_experts, hidden, dim):
        raise ValueError(f"w_down must be [E, H, D] = {(n_experts, hidden, dim)}; got {tuple(w_down.shape)}")
    if routing.indices.shape[0] != n_tokens:
        raise ValueError(f"routing covers {routing.indices.shape[0]} tokens but x has T={n_tokens}")
    if routing.n_experts != n_experts:
        raise ValueError(
            f"routing scores cover E={routing.n_experts} experts but the weights have E={n_experts}"
        )
