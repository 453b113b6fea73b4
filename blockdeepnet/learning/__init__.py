"""Federated learning maths: the paper's CNN, local update rules and plaintext aggregation (Eq. 3, Eq. 4)."""

from blockdeepnet.learning.aggregation import BestRound, converged, fedavg, weighted_delta_sum
from blockdeepnet.learning.model import (
    PAPER_CNN_PARAMS,
    PARAM_SHAPES,
    Params,
    evaluate,
    flatten,
    forward,
    init_params,
    loss_and_grad,
    predict,
    unflatten,
)
from blockdeepnet.learning.rules import FedAvgSGD, LocalResult, LocalRule, VarianceReduced

__all__ = [
    "PAPER_CNN_PARAMS",
    "PARAM_SHAPES",
    "BestRound",
    "FedAvgSGD",
    "LocalResult",
    "LocalRule",
    "Params",
    "VarianceReduced",
    "converged",
    "evaluate",
    "fedavg",
    "flatten",
    "forward",
    "init_params",
    "loss_and_grad",
    "predict",
    "unflatten",
    "weighted_delta_sum",
]
