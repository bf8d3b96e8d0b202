"""Shared machinery of the stages: activation capture, generation backends (HF, vLLM), the executors
(this process or Ray), and the numerical parts several stages use: the prober, traces and cliff
metrics, head attribution, head scaling, the refusal keyword judge and the lm-eval wrapper.

Imports only `core`; names no stage. A stage hands an executor a job built here or in the stage itself.
"""
