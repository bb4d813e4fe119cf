import logging
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("lightning.fabric").setLevel(logging.WARNING)

import torch  # noqa: E402

# Tiny models on 2 shared cores: one intra-op thread is much faster than torch's default under load.
torch.set_num_threads(1)
