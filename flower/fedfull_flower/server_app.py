"""ServerApp: the script named by the run config runs its own round loop here, with Flower as its transport."""
import sys

from flwr.serverapp import Grid, ServerApp

import tasks
from fedfull_flower.transport import serve

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    try:
        serve(grid, context)
    except (tasks.ConfigError, tasks.DataError, tasks.ModelError) as e:  # a user's mistake: one line
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
