"""Train one stage: python train.py model=vgg16 stage=binary data.root=/path/to/chest_xray
(the same as pneumonia-train; pneumonia/cli.py)"""

from pneumonia.cli import train_main

if __name__ == "__main__":
    train_main()
