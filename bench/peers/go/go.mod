module echosvc/bench/peers/go

go 1.19
