"""TFS's gRPC method paths, in one place: frontends route by them, the fleet calls them."""

from __future__ import annotations

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"

PREDICT = f"/{PREDICTION_SERVICE}/Predict"
CLASSIFY = f"/{PREDICTION_SERVICE}/Classify"
REGRESS = f"/{PREDICTION_SERVICE}/Regress"
MULTI_INFERENCE = f"/{PREDICTION_SERVICE}/MultiInference"
GET_MODEL_METADATA = f"/{PREDICTION_SERVICE}/GetModelMetadata"
GET_MODEL_STATUS = f"/{MODEL_SERVICE}/GetModelStatus"
HANDLE_RELOAD_CONFIG = f"/{MODEL_SERVICE}/HandleReloadConfigRequest"
