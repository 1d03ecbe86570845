from spp.cli import main

main()
