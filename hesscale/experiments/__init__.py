"""The paper's experiments (figures, training benchmarks); the core library never imports this."""
