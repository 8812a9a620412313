"""Explain every X-ray of a folder: python explain.py input=/path/to/folder
model_uri=<model folder> (the same as pneumonia-explain; pneumonia/cli.py)"""

from pneumonia.cli import explain_main

if __name__ == "__main__":
    explain_main()
