"""kvlib replay: how much of a trace prefix caching and the library would serve, and what it would save.

trace readers (traces), prepared requests (prepare), caches (policies), the accounting, the
capacity sweep (run), the cost model (cost), reports and plots, the live client (live) and the
multi-turn session builder (sessions). The segmenter lives in kvlib.segment, shared with serve.
"""
