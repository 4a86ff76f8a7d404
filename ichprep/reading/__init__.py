"""Reading a SOURCE: listing its members, their headers and Hounsfield units, and the label CSV."""
