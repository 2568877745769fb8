"""The CDSP Kubeflow pipeline, its compilation and its local run."""
