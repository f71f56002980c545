"""Deprecated alias of ``surgeon.inputs`` (passes/ and targets/ still import it; removed after they move)."""

from .inputs import *  # noqa: F401,F403
from .inputs import Inputs, as_args_kwargs, batch_size, call, describe, forward_params, named_inputs, tensors_of  # noqa: F401
