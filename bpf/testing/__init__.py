"""BPF programs used only by benchmarks and tests (never attached by relayd)."""
