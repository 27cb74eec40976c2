//! Turn a model's final answer into a validated verdict and an outcome; never a silent allow.
