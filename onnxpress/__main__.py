from onnxpress.cli import entry

entry()
