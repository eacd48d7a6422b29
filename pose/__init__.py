"""effpose: pose models, data, training, evaluation and export."""
