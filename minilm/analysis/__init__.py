"""After runs: reads run dirs, never imports the training or launch code."""
