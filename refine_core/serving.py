"""The trained model as an MLflow Model: ``mlflow.pyfunc.load_model(uri).predict(["prompt", ...])`` returns text.

Each training stage logs its final model with :meth:`refine_core.tracking.MlflowTracker.log_model`: an MLflow
``pyfunc`` model whose artifact ``hf`` is the model directory in Hugging Face layout (``config.json``,
``model.safetensors``, the tokenizer), the same files fla and :func:`refine_core.models.load_model_dir` read. The
model is defined from code (``refine_core/mlflow_model.py``), not pickled: loading it runs no stored object.

``predict`` takes a list of prompts (or a one-column DataFrame / Series) and returns one greedy continuation per
prompt, decoded; ``params={"max_new_tokens": N}`` sets its length (default 32).
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc

from refine_core.tracking import DEFAULT_MAX_NEW_TOKENS, HF_ARTIFACT


class RefineLanguageModel(mlflow.pyfunc.PythonModel):
    """Greedy text generation with a refine_core model (DeltaNet, GatedDeltaNet or LaCT)."""

    def load_context(self, context: Any) -> None:
        from refine_core.models import load_model_dir
        from refine_core.tokenizer import load_tokenizer

        directory = context.artifacts[HF_ARTIFACT]
        self.model = load_model_dir(directory).eval()
        self.tokenizer = load_tokenizer(directory)

    # No type hints here on purpose: MLflow reads them as the model's input schema; the signature is given explicitly
    # (:func:`refine_core.tracking.pyfunc_signature`) so that ``max_new_tokens`` is a declared parameter.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        from refine_core.evaluation.answering import answer_prompts

        prompts = _prompts(model_input)
        max_new = int((params or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        ids = [self.tokenizer.encode(p) for p in prompts]
        return answer_prompts(self.model, self.tokenizer, ids, max_new, batch_size=8)


def _prompts(model_input: Any) -> list[str]:
    """A list of strings from a list, a Series or the first column of a DataFrame."""
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        model_input = model_input[model_input.columns[0]]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    if isinstance(model_input, str):
        model_input = [model_input]
    prompts = [str(p) for p in model_input]
    if not prompts:
        raise ValueError("predict needs at least one prompt")
    return prompts
