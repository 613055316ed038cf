"""What every system's flow runs on: its parameters (:mod:`.params`), the run context and its writer
(:mod:`.run`), the summary rows every system reports (:mod:`.summary`) and the Prefect task that
measures its own busy time (:mod:`.tasks`)."""
