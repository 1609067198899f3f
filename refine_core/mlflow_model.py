"""The MLflow "model from code" file of :class:`refine_core.serving.RefineLanguageModel` (see there).

MLflow runs this file when it loads a logged model, instead of unpickling a stored object.
"""

from mlflow.models import set_model

from refine_core.serving import RefineLanguageModel

set_model(RefineLanguageModel())
