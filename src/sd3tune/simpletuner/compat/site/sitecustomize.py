# Put on PYTHONPATH of the training process only, by sd3tune.simpletuner.launch.
from sd3tune.simpletuner.compat import install

install()
