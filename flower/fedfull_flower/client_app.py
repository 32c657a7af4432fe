"""ClientApp: each message runs the script's per-client function for the clients this node serves."""
from flwr.clientapp import ClientApp

from fedfull_flower.node import answer_query, handle

app = ClientApp()
app.train()(handle)
app.query()(answer_query)
