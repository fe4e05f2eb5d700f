"""Members come and go (docs/churn.md): plan adoption as a state machine (``adoption``), the state
protocol ``swarm.state.v1`` (``state_service``), the adapter that runs adoption's commands
(``follower``), and the backup pool of single-holder stages (``backup``)."""
