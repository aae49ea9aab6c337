"""``resnet-deploy predict``: classify images, image folders or an .npz with any artifact.

    from resnet_deploy.predict import classify
    result = classify("artifacts/model_int8.tflite", ["cat.jpg", "photos/"], top_k=3)
    result.to_dict()["predictions"][0]["top"][0]   # {"class": "cat", "index": 3, "probability": 0.91}
"""

from resnet_deploy.predict.core import Result, classify, softmax, to_probabilities
from resnet_deploy.predict.images import PredictError, collect, fit_image, load_image

__all__ = ["classify", "Result", "PredictError", "collect", "fit_image", "load_image", "softmax",
           "to_probabilities"]
