"""The trained model as an MLflow Model: logged by the tracker, registered, loaded with mlflow.pyfunc, it
generates the same text as the model itself (issue 14)."""

from __future__ import annotations

import pytest
import torch

from refine_core.models import DeltaNetConfig, build_model, generate, save_pretrained
from refine_core.models.generation import SamplingConfig
from refine_core.tokenizer import ByteTokenizer
from refine_core.tracking import MlflowTracker

mlflow = pytest.importorskip("mlflow")


def test_a_logged_model_loads_with_pyfunc_and_generates_the_models_own_text(tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_PARENT_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    torch.manual_seed(0)
    tok = ByteTokenizer()
    config = DeltaNetConfig(hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=tok.vocab_size,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model = build_model(config).eval()
    model_dir = save_pretrained(model, tmp_path / "model", tokenizer=tok)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with MlflowTracker(experiment="serving", tracking_uri=store) as tracker:
        tracker.log_model(model_dir)
        run_id = tracker.run_id
    client = mlflow.MlflowClient(store)
    files = {f.path for f in client.list_artifacts(run_id, "model")}
    assert "model/MLmodel" in files and "model/artifacts" in files
    hf = {f.path for f in client.list_artifacts(run_id, "model/artifacts/model")}
    assert {"model/artifacts/model/config.json", "model/artifacts/model/model.safetensors"} <= hf  # the HF layout
    client.create_registered_model("tiny")
    version = client.create_model_version("tiny", f"runs:/{run_id}/model", run_id=run_id)
    mlflow.set_tracking_uri(store)
    try:
        loaded = mlflow.pyfunc.load_model(f"models:/tiny/{version.version}")
        text = loaded.predict(["The cat sat on", "Hello"], params={"max_new_tokens": 6})
    finally:
        mlflow.set_tracking_uri(None)
    assert len(text) == 2 and all(isinstance(t, str) for t in text)
    ids = torch.tensor([tok.encode("Hello")])
    out = generate(model, ids, sampling=SamplingConfig(max_new_tokens=6), eos_token_id=tok.eos_token_id)
    assert text[1] == tok.decode(out.tokens[0, : int(out.lengths[0])].tolist(), skip_special_tokens=True)
