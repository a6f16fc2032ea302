"""What can be pruned: model adapters, importance scores, subnets, slicing and export."""
