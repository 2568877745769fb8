"""The five KFP components of the CDSP pipeline (see `components.stages`)."""
