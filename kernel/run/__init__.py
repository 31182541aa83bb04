"""The application around the kernel: config files, the runner, run folders, progress, the CLI
and checkpoints. Nothing below `kernel/` imports from here."""
