import logging
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
