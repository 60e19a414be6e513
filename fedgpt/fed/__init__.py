"""Everything Flower: how the corpus is split among clients, what crosses the wire, the ClientApp's and the
ServerApp's work, the strategies, and the simulation. The core (fedgpt/*.py) knows nothing of this package."""
