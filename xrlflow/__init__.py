"""xrlflow: a reinforcement-learning graph superoptimizer for ONNX models."""

__version__ = "0.1.0"
