"""Regularizers: one module each, a functional core plus a Lightning callback."""

from lightning_tricks.regularization.dropconnect import DropConnect as DropConnect
from lightning_tricks.regularization.dropconnect import DropConnectConv2d as DropConnectConv2d
from lightning_tricks.regularization.dropconnect import DropConnectLinear as DropConnectLinear
from lightning_tricks.regularization.fractional_pooling import FractionalMaxPooling as FractionalMaxPooling
from lightning_tricks.regularization.fractional_pooling import (
    SeededFractionalMaxPool2d as SeededFractionalMaxPool2d,
)
from lightning_tricks.regularization.stochastic_depth import StochasticDepth as StochasticDepth
