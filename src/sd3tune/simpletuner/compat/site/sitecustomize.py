# Put on PYTHONPATH of the training process only, by sd3tune.simpletuner.launch.
from sd3tune.simpletuner.compat import die_with_launch, install

die_with_launch()  # first: a training whose sd3tune is gone must not run on
install()
