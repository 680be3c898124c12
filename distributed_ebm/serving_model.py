"""The served model's code, as MLflow logs it ("models from code"): the registered model holds this
file and the checkpoint bundle, not a pickled Python object. Loading it imports
`distributed_ebm.serving` (the package must be installed where the model is served) and builds
the model from the checkpoint artifact in `EBMModel.load_context`."""

from mlflow.models import set_model

from distributed_ebm.serving import EBMModel

set_model(EBMModel())
