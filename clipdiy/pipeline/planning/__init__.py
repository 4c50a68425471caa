"""What tonight must do: the incremental rules, the pending rows planned on Ray Data, the run manifest."""
