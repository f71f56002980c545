"""Third-party flows through the whole pipeline: passes that run the captured graph use only batch
sizes the capture accepts (normflows' AffineCouplingBlock fixes the batch dimension at export)."""

from __future__ import annotations

import pytest
import torch
from _models import NormflowsFlow

import surgeon

pytest.importorskip("normflows")


def test_normflows_affine_coupling_flow_fold_and_inverse_train_at_the_captured_batch() -> None:
    torch.manual_seed(0)
    model = NormflowsFlow(init_zeros=True).eval()
    calib = [(torch.randn(4, 4),) for _ in range(3)]
    # was: AssertionError: Guard failed: x.size()[0] == 4 (flow-inverse's minibatches of 12)
    # a small inverse (CI time): what this shows is the batch its training runs the flow at
    res = surgeon.optimize(model, (torch.randn(4, 4),), calib, passes="flow-fold,flow-inverse{steps=100,hidden=32}")
    assert res.report["calibration"]["calibrate"] is not None
    inverse = [s for s in res.report["sites"] if s["pass"] == "flow-inverse"]
    # the fit batches (8 of the 12 samples: one batch is held out) were used at batch 4, the capture's
    assert inverse and inverse[0]["check"]["fit_samples"] == 8 and inverse[0]["check"]["fit_steps"] > 0, inverse
