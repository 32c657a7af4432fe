"""ServerApp: the script named by the run config runs its own round loop here, with Flower as its transport."""
from flwr.serverapp import Grid, ServerApp

import tasks
from fedfull_flower.transport import serve

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    try:
        serve(grid, context)
    except (tasks.ConfigError, tasks.DataError, tasks.ModelError) as e:
        # a user's mistake: one line. Raised as a plain exception so that Flower marks the run failed with this text
        # (a SystemExit would end the process unreported); the launcher prints it and exits non-zero
        raise RuntimeError(f"error: {e}") from None
