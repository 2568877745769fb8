"""The five KFP components of the CDSP pipeline.

- `stages.py`: the component functions, typed (generated from cdsp_core/config.py by `make components`);
- `steps.py`: what each of them runs, in cdsp_core;
- `generate.py`: writes `stages.py` and `pipelines/parameters.py`, and declares what each component takes.
"""
