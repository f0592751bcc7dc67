"""The images every dataset is converted to and the CNN takes, and the CNN's conv widths
(docs/design.md, "The experiment").

Apart from the data loaders so that the model can size its layers without importing them, and
the config can check a group count against the widths without importing torch.
"""

#: Height and width of every image: CIFAR-10's 32×32 RGB.
IMAGE_SIZE = 32
#: Classes the CNN can tell apart (its last layer's outputs, study.model): CIFAR-10's.
N_CLASSES = 10
#: Output channels of the CNN's three conv layers (study.model): a GroupNorm group count must
#: divide each.
CONV_WIDTHS = (16, 32, 64)
