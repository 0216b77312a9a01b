module echosvc/bench/loadgen

go 1.19
