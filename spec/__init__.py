"""convc.spec"""
