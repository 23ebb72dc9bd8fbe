"""Tools that serve the engine but are not part of the engine a reader reads.

    prepare         converts the bundled default model (a GGUF) into a Hugging Face folder
                    (`python -m nanodance prepare`)
    compile_check   compiles the Triton kernels for a GPU target on a machine without one
                    (`python -m nanodance.tools.compile_check`)
    synthetic       synthetic paged batches for the kernel tests and the GPU benchmark

The engine itself imports only `prepare.default_model_dir`, lazily, when no model is named.
"""
