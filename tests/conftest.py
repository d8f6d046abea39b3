import sys
from pathlib import Path

import keras_adamw

# The float64 reference lives beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_report_header(config):
    return f"keras_adamw {keras_adamw.__version__} from {Path(keras_adamw.__file__).parent}"
