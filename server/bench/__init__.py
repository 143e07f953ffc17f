"""The benchmarks behind `windowlm bench`, each printing one JSON report: `decode` times the decode step of the
sliding cache and measures its memory, against the reference local-attention package and HuggingFace's Mistral
and against the machine's rooflines (decode.py, decode_reference.py, roofline.py, on timing.py's bench model and
timing in turns); `serve` drives the whole HTTP path with concurrent streaming clients (serve.py); `soak` runs a
bounded load of careless and hostile clients against a server and checks that it comes through unharmed (soak.py,
with the raw HTTP client in http.py and the server probes in probe.py). `constrained` times decoding under a JSON
schema against unconstrained, and compiling schemas (constrained.py). Every report records the machine and the
code it ran on (machine.py). The measured reports are in results/, explained in README.md beside this file.
"""
