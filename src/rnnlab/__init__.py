"""rnnlab: GRU, LSTM or plain RNN for your sequence task, answered reproducibly."""

__version__ = "0.1.0"
