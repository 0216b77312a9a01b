from echosvc.cli import main

main()
