"""The end-to-end benchmark's parts (`run_eval.py bench e2e`; the command itself is evals/tools/bench_e2e.py).

models: the random-weight models and the fla KDA folder both harnesses read; workload: the request mixes;
harnesses: our backend and the lm-eval `hf` anchor, and timing one pass; common: device rates (copy, matmul),
memory and the one prefill call; mixes, decode, long, hybrid: the sections; report: tables and files;
estimate: how long each section will take on an H200.
"""
